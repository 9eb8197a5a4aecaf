"""dpoc's preference losses, one function per paired loss (`FUNCTIONS`), named as in `dpoc.contract.losses`;
the unpaired kto reads other inputs (`dpoc.runtime.losses.kto`)."""

from __future__ import annotations

from dpoc.contract import losses
from dpoc.runtime.losses import kto, paired, reference_free
from dpoc.runtime.losses.inputs import Pairs, Params

FUNCTIONS = {name: getattr(paired if losses.BY_NAME[name].reference else reference_free, name)
             for name in losses.PAIRED}

__all__ = ["FUNCTIONS", "Pairs", "Params", "kto"]
