"""Export a trained run for use without dat-ds: its weights and a self-contained torch.export program.

    python recipes/export.py --checkpoint runs/fmnist --out exported/fmnist

``--checkpoint`` takes a training run's ``--output-dir`` (its newest checkpoint), its
``checkpoints/`` folder, a tag folder such as ``checkpoints/best``, or a model-states file.
``--out`` receives:

* the weights as safetensors with the normalization, input size and class names: a
  ``transformers/`` ``save_pretrained`` folder (with ``preprocessor_config.json``) for a
  transformers backbone; a ``timm/`` folder (``model.safetensors`` + ``config.json``) that plain
  ``timm.create_model`` loads for a timm backbone with its native stem; for dat-ds's small stem
  and its CIFAR zoo models, which stock timm cannot build, ``dat_ds/`` weights instead;
* ``model.pt2``: ``torch.export.load(path).module()`` runs it with plain torch on float images in
  [0, 1] (normalization inside), any batch size;
* ``export.json``: what was written, the input size, normalization and class names.
"""
import argparse
import os

from dat_ds import cli, dist
from dat_ds.checkpoint_io import find_checkpoint, load_model
from dat_ds.models.export import export_model, writable_folder


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="run folder, its checkpoints/ folder, a tag folder or a model-states file")
    p.add_argument("--out", required=True, help="folder to write the exported files into (created if missing)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help=argparse.SUPPRESS)  # what the deepspeed launcher and torch.distributed.launch pass
    return p


def main():
    args = parser().parse_args()
    model_file = find_checkpoint(args.checkpoint)
    if dist.launcher_rank() != 0:  # started by a launcher on several ranks: one writes, the others are done
        return
    model, meta = load_model(model_file)
    out = writable_folder(args.out)
    manifest = export_model(model, meta, out)
    print(f"exported {model_file} ({meta['backbone']}, input {'x'.join(map(str, manifest['input_size']))}) to {out}:")
    print(f"  weights  {manifest['weights']}")
    print(f"  program  {manifest['program']}")


if __name__ == "__main__":
    cli.run(main)
