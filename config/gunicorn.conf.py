"""gunicorn settings of ``hilum web`` (https://docs.gunicorn.org/en/stable/settings.html).

``bind``, ``workers`` and ``threads`` come from Hilum's own settings (``[server] host``,
``[http] port``, ``workers``, ``threads``) and are set by ``hilum web``; the rest is here.
Each worker process opens its own connections to the index and the blob store after the fork.
"""

# Threads, not async: request handlers block on the database and the blob store.
worker_class = "gthread"
# A STOW-RS of a multi-gigabyte slide, or a whole-study WADO-RS, is one long request.
timeout = 600
graceful_timeout = 30
keepalive = 5
# Never load the app in the master: database pools and S3 clients must not cross a fork.
preload_app = False
accesslog = "-"
errorlog = "-"
# The path without its query string, as `hilum serve` logs it: a query may hold patient names
# (QIDO-RS PatientName=) or a login's one-time code (/login/oidc/callback?code=).
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'
