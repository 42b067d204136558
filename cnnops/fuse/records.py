"""FusionRecord: what fuse and fusion_report say about one candidate site."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class FusionRecord:
    """One candidate site.

    name: qualified name of the site's module (the BN for BN sites, the conv for
    conv-ReLU, the pool) or ``scope:op`` for a function call inside module
    ``scope`` (e.g. ``layer1.0:add``); pattern: e.g. ``conv-bn-add-relu``;
    status: ``fused`` or ``skipped``; reason: why (or a note for fused sites).
    """
    name: str
    pattern: str
    status: str
    reason: str = ""
