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
