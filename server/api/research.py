"""The way back from de-identified data to the patient: admin only.

``GET /api/research/identities?project=&pseudonym=&study=``  the originals (Patient ID, Issuer,
Study Instance UID, date shift) behind a pseudonym or a de-identified Study Instance UID, from
the ``deidentified_study`` rows of the request's partition (the clinical one, where the
originals live; a research partition has none). One of ``pseudonym`` and ``study`` is required.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from server.access import Action, requires
from server.partitions import request_archive
from storage.dicom_file import is_valid_uid
from storage.errors import InvalidQuery
from storage.pseudonyms import identities


def research_blueprint() -> Blueprint:
    blueprint = Blueprint("research", __name__)

    @blueprint.get("/research/identities")
    @requires(Action.ADMIN)
    def find_identities() -> Any:
        pseudonym = request.args.get("pseudonym") or None
        study = request.args.get("study") or None
        if not pseudonym and not study:
            raise InvalidQuery("give pseudonym= or study= (a de-identified Study Instance UID)")
        if study is not None and not is_valid_uid(study):
            raise InvalidQuery(f"{study[:80]!r} is not a Study Instance UID")
        found = identities(
            request_archive(),
            project=request.args.get("project") or None,
            pseudonym=pseudonym,
            deidentified_study_uid=study,
        )
        return jsonify([identity.as_json() for identity in found])

    return blueprint
