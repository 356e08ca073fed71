"""The accuracy–latency front (``ehap sweep``, ``ehap_fx.sweep``) as a tools/ benchmark:
every arm's INT8 ONNX file timed side by side with dense fp32 and dense INT8 in one
onnxruntime run, speed-ups printed as ratios. Same flags as ``ehap sweep``; see
docs/results.md ("Accuracy at speed") for the figures and the commands that made them.

    python tools/sweep.py --model resnet56 --data ../shared/data --pretrained-dir ../shared/weights \\
        --targets 0.65 0.5 --scorers removal l1 --distill both
    python tools/sweep.py --quick
"""

import sys

from ehap_fx.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
