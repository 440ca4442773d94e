"""Defaults shared by the CRD, the CLI and the pipeline stages, in a module light enough for the CLI to
import at start-up (doppel.api loads pydantic)."""

# The newest samples kept. Distinct replies teach more than passes over the same ones: hyperledger's ghaskins,
# the same held-out replies, one pass each: 425 samples -17.5% held-out loss, 925 -20.2%; two passes over
# the 425, -18.7% at best (docs/fidelity.md). A GPU trains thousands in minutes; `doppel local`'s CPU
# budget keeps fewer (local.settings.LOCAL_MAX_SAMPLES).
MAX_SAMPLES = 2000  # spec.data.maxSamples, `doppel scrape --max-samples`
