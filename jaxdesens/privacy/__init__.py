"""Privacy measured by attackers: re-identification audit, off-the-shelf and learned attackers, figure.

`reidentification_audit(...) -> dict`, `audit_markdown(audit) -> str` and `privacy_utility_figure(...)`
are what a report needs; `desensitization_conditions` builds the probe conditions they score.
"""

from jaxdesens.privacy.attackers import Attacker, PixelAttacker, RecognizerAttacker
from jaxdesens.privacy.audit import (
    Condition,
    audit_markdown,
    desensitization_conditions,
    reidentification_audit,
    worst_case,
)
from jaxdesens.privacy.figure import privacy_utility_figure, privacy_utility_points
from jaxdesens.privacy.reid import gallery_split, identification_report, similarity

__all__ = ["Attacker", "Condition", "PixelAttacker", "RecognizerAttacker", "audit_markdown",
           "desensitization_conditions", "gallery_split", "identification_report", "privacy_utility_figure",
           "privacy_utility_points", "reidentification_audit", "similarity", "worst_case"]
