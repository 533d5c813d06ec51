"""The DIMSE SCP: one module per DIMSE service, all translating between the wire and storage."""
