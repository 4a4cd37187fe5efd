"""Ray job: `sparserm {rm,sae,align,steer} evaluate`. Usage: python -m jobs.evaluate KIND ARGS... (as the CLI)

  python -m jobs.evaluate rm RM_DIR DATA [--json]            preference accuracy of a reward-model folder
  python -m jobs.evaluate sae SAE_DIR                        fvu, l0, dead fraction of an SAE folder
  python -m jobs.evaluate align POLICY DATA [--json]         TruthfulQA MC1/MC2 of a policy or adapter
  python -m jobs.evaluate steer MAP_DIR [key=value ...]      steered vs unsteered vs static"""
import sys

from sparserm.cli import main

KINDS = ("rm", "sae", "align", "steer")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in KINDS:
        sys.exit(f"usage: python -m jobs.evaluate {{{','.join(KINDS)}}} ARGS...")
    sys.exit(main([sys.argv[1], "evaluate", *sys.argv[2:]]))
