"""loraflow: LoRA/QLoRA fine-tuning of Llama-family models as a Prefect 3 flow."""

import os

__version__ = "0.1.0"

# torch's CPU allocator backs each allocation of 2 MiB or more with transparent huge pages when this is set (c10's
# alloc_cpu reads it once, at torch's first allocation, so it is set here, before any loraflow module imports
# torch). Training on a CPU allocates and frees the logits every step (tokens × vocabulary × 4 B: 472 × 49,152 × 4 B
# = 93 MB for the tiny config's step), and in 4 KiB pages the kernel faults in and zeroes each page again: the
# tiny config's 120 steps took 49.2 s with it unset, 35.6 s with it set (docs/benchmarks.md, "CPU training and
# the kernel's pages"). Only where no NVIDIA driver is present: a GPU run's tensors are not the CPU allocator's, and
# what huge pages would do to its host-side loading is not measured. A value set outside wins.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
