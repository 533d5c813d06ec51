"""The protocols: DIMSE (``server.dimse``) and the command line (``server.cli``)."""
