"""The model side: which families are supported, how a checkpoint is loaded, the embedded tiny models.

Imports run one way, each module only from those above it (tests/test_models.py LAYERS checks it):

    families.py       per-family table: processor class, box space, vision tokens, fast paths
    tiny_families.py  the tiny random-init specs of the non-Qwen2 families (transformers only)
    tiny.py           the tiny checkpoint builder           <- families, tiny_families
    loading.py        policy / reference / processor loader <- families

Nothing here imports the rest of visual_rft but versions.py; rl/, runtime and the commands import from here.
Importing the package checks the transformers version and registers the image-only processors with
AutoProcessor, so `AutoProcessor.from_pretrained` on a saved checkpoint finds them (an exported
model's card says `import visual_rft.models` for this).
"""

from visual_rft.models.quiet import name_deepspeeds_cpu_accelerator

name_deepspeeds_cpu_accelerator()  # before the imports below can reach DeepSpeed's accelerator pick

from visual_rft.models.families import register_processors  # noqa: E402
from visual_rft.versions import check_transformers  # noqa: E402

check_transformers()  # every command that touches a model comes through here: refuse untested versions early
register_processors()
