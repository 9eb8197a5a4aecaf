"""dpoc's megatron-core DPO runtime (README.md here). Importing the package, before any of its modules imports
megatron-core, silences the library warnings known to be harmless (`known_warnings`) and defers megatron-core's
kernel fusions to their first call (`deferred_fusions`: its import no longer pulls in TorchDynamo)."""

from dpoc.common import deferred_fusions
from dpoc.runtime.known_warnings import silence

silence()
deferred_fusions.install()
