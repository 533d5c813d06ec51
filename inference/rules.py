"""Which installed models run on which series: the ``[[inference.rules]]`` of the settings,
intersected with what each model's manifest says it applies to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from config.settings import InferenceRule

if TYPE_CHECKING:
    from inference.registry import Model


def series_matches(
    series: Mapping[str, str],
    *,
    modalities: Sequence[str],
    sop_class_uids: Sequence[str],
    body_parts: Sequence[str],
) -> bool:
    """Every non-empty list contains the series' value (keys "Modality", "SOPClassUID",
    "BodyPartExamined"); the body part is compared case-insensitively, as modalities write
    BodyPartExamined inconsistently. Both a rule and a manifest's ``applies_to`` match so."""
    wanted_parts = {part.upper() for part in body_parts}
    return (
        (not modalities or series.get("Modality", "") in modalities)
        and (not sop_class_uids or series.get("SOPClassUID", "") in sop_class_uids)
        and (not wanted_parts or (series.get("BodyPartExamined") or "").upper() in wanted_parts)
    )


def rule_matches(rule: InferenceRule, model: Model, series: Mapping[str, str]) -> bool:
    return rule.model in ("*", model.name) and series_matches(
        series,
        modalities=rule.modalities,
        sop_class_uids=rule.sop_class_uids,
        body_parts=rule.body_parts_examined,
    )


def models_for_series(
    rules: Sequence[InferenceRule], models: Sequence[Model], series: Mapping[str, str]
) -> list[Model]:
    """The models a rule enables for ``series`` (keys "Modality", "SOPClassUID",
    "BodyPartExamined") and whose manifest accepts it, each once."""
    return [
        model
        for model in models
        if model.applies_to(series) and any(rule_matches(r, model, series) for r in rules)
    ]


def _unmet(
    series: Mapping[str, str],
    modalities: Sequence[str],
    sop_class_uids: Sequence[str],
    body_parts: Sequence[str],
) -> str:
    """What of a rule or manifest the series does not meet, in words; "" when it meets all."""
    unmet = []
    modality, sop_class = series.get("Modality", ""), series.get("SOPClassUID", "")
    body_part = series.get("BodyPartExamined") or ""
    if modalities and modality not in modalities:
        unmet.append(f"modality {'/'.join(modalities)} (not {modality or 'none'})")
    if sop_class_uids and sop_class not in sop_class_uids:
        unmet.append(f"SOP class {'/'.join(sop_class_uids)} (not {sop_class or 'none'})")
    if body_parts and body_part.upper() not in {part.upper() for part in body_parts}:
        unmet.append(f"body part {'/'.join(body_parts)} (not {body_part or 'empty'})")
    return ", ".join(unmet)


def why_no_model(
    rules: Sequence[InferenceRule], models: Sequence[Model], series: Mapping[str, str]
) -> str:
    """Why no model runs on ``series``, one clause per installed model: what its manifest's
    ``applies_to`` needs that the series lacks, or that no rule enables it; "" when one runs."""
    if models_for_series(rules, models, series):
        return ""
    if not models:
        return "no model is installed"
    if not rules:
        return "AI is switched off ([inference] rules = [])"
    clauses = []
    for model in models:
        wanted = model.manifest.applies_to
        unmet = _unmet(series, wanted.modalities, wanted.sop_class_uids, wanted.body_parts)
        if unmet:
            clauses.append(f"{model.name} needs {unmet}")
        else:
            clauses.append(f"no [[inference.rules]] entry enables {model.name} for it")
    return "; ".join(clauses)


def series_for_model_by_hand(
    model: Model, series: Sequence[Mapping[str, str]]
) -> list[Mapping[str, str]]:
    """The series an administrator's "run this model" applies to: those whose modality and SOP
    class the model's manifest accepts (what its network can read), whatever the body part and
    the ``[[inference.rules]]`` say (the usual reasons why no model applied)."""
    wanted = model.manifest.applies_to
    return [
        s
        for s in series
        if series_matches(
            s, modalities=wanted.modalities, sop_class_uids=wanted.sop_class_uids, body_parts=[]
        )
    ]
