"""dpoc's megatron-core DPO runtime (README.md here). Importing the package silences the library warnings known
to be harmless (`known_warnings`), before any of its modules imports megatron-core."""

from dpoc.runtime.known_warnings import silence

silence()
