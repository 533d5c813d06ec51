"""Deliveries from the change feed (``storage/events.py``): signed webhooks and the FHIR push,
by a delivery loop that runs in ``hilum serve`` and in ``hilum events``."""
