"""gunicorn settings of ``hilum web`` (https://docs.gunicorn.org/en/stable/settings.html).

``bind``, ``workers`` and ``threads`` come from Hilum's own settings (``[server] host``,
``[http] port``, ``workers``, ``threads``) and are set by ``hilum web``; the rest is here.
Each worker process opens its own connections to the index and the blob store after the fork.
"""

# Threads, not async: request handlers block on the database and the blob store. `hilum web`
# sets worker_class to gthread with Hilum's request deadlines
# (server.gunicorn_worker.DeadlineThreadWorker) and worker_connections from [http].
worker_class = "gthread"
# The request line (a QIDO-RS with a list of UIDs is long): gunicorn's largest; the header
# fields, gunicorn's defaults stated. Larger: 414 or 431 (`hilum serve`: 64 KiB in all).
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
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
