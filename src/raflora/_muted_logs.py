"""Third-party log lines muted before anything imports them (imported first by ``raflora``).

bitsandbytes, which PEFT imports whenever it is installed, tries on CPUs with AVX512-BF16 to fetch
an optional CPU kernel from the Hugging Face Hub and logs a warning when it cannot (offline, or
an untrusted publisher; the ``kernels`` package says it skips the check offline); its own torch
fallback is what runs then, so nothing is lost. Left alone, those lines would print on every
command that builds a model.
"""

import logging

for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).setLevel(logging.ERROR)
