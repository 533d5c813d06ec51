"""The SR that records a reviewer's decision on one AI finding, stored in the finding's study.

What it follows:

- PS3.3 C.17.2 SR Document General Module: the new document names the model's report in the
  Predecessor Documents Sequence (0040,A360; C.17.2.3: an SR whose content this one includes
  in part) and the reviewer in the Verifying Observer Sequence (0040,A073), with Verification
  Flag (0040,A493) VERIFIED, Verifying Organization and Verification DateTime (C.17.2.2): the
  reviewer attests to the content, which is this decision. Completion Flag COMPLETE.
- PS3.16 TID 1500 Measurement Report, observed by the reviewer as a person (TID 1002/1003), with
  one Measurement Group (TID 1501) for the finding: the model's Tracking Identifier and
  Tracking UID (TID 4108; the same UID marks the same finding across documents), its Finding
  and Finding Site, and a qualitative evaluation "Review of AI finding" = "Accepted" or
  "Rejected", with the reviewer's comment (DCM 121106 Comment) when given. DICOM has no code for
  the decision, so those three concepts are local codes in a private coding scheme ("99HILUM";
  PS3.16 8: designators beginning with "99" are for local use).
- Comprehensive 3D SR Storage (PS3.3 A.35.13), as the model's report; its own series ("AI
  finding review", number 9003) in the same study, with evidence referencing the model's SR.
"""

from __future__ import annotations

from datetime import datetime

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from inference.measurement_report import ReportedFinding
from storage.reviews import Decision

REVIEW_SERIES_NUMBER = 9003
REVIEW_SERIES_DESCRIPTION = "AI finding review"
MANUFACTURER = "Hilum"
REVIEW = hd.sr.CodedConcept("REVIEW", "99HILUM", "Review of AI finding")
DECISION_CODES = {
    Decision.ACCEPTED: hd.sr.CodedConcept("ACCEPTED", "99HILUM", "Accepted"),
    Decision.REJECTED: hd.sr.CodedConcept("REJECTED", "99HILUM", "Rejected"),
}


def review_series_uid(study_instance_uid: str) -> str:
    """One review series per study: every decision on the study's findings is an SR in it."""
    return generate_uid(entropy_srcs=["hilum-review-series", study_instance_uid])


def _concept(code: tuple[str, str, str] | None, fallback: str) -> hd.sr.CodedConcept:
    if code is None or not code[1]:
        return hd.sr.CodedConcept("121071", "DCM", fallback or "Finding")
    scheme, value, meaning = code
    return hd.sr.CodedConcept(value, scheme, meaning)


def review_report(
    model_report: Dataset,
    finding: ReportedFinding,
    decision: Decision,
    *,
    reviewer: str,
    comment: str,
    organization: str,
    decided_at: datetime,
    instance_number: int,
) -> hd.sr.Comprehensive3DSR:
    """The decision as a verified Comprehensive 3D SR in the study of ``model_report``."""
    # PS3.5 6.2.1.2: a name typed as one string is one component; the trailing "^" says so.
    name = reviewer if "^" in reviewer else reviewer + "^"
    person = hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=name),
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=finding.tracking_uid, identifier=finding.tracking_identifier or finding.title
        ),
        finding_type=_concept(finding.finding_code, finding.finding),
        finding_sites=(
            [hd.sr.FindingSite(anatomic_location=_concept(finding.site_code, finding.site))]
            if finding.site_code
            else None
        ),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=REVIEW, value=DECISION_CODES[decision])
        ],
    )
    if comment:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=comment,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=person),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=[group],
        title=codes.DCM.ImagingMeasurementReport,
    )
    report = hd.sr.Comprehensive3DSR(
        evidence=[model_report],
        content=content,
        series_instance_uid=review_series_uid(model_report.StudyInstanceUID),
        series_number=REVIEW_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=True,
        is_verified=True,
        verifying_observer_name=name,
        verifying_organization=organization,
        previous_versions=[model_report],
        series_description=REVIEW_SERIES_DESCRIPTION,
    )
    # C.17.2.2: when the reviewer verified it (highdicom writes the time it ran).
    report.VerifyingObserverSequence[0].VerificationDateTime = decided_at.strftime(
        "%Y%m%d%H%M%S.%f+0000"
    )
    return report
