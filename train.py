"""Train a DETR detector around the configured Joiner: ``detr-backbone train`` from the repository root.

python train.py                                      # the CPU default: learns the shapes data
python train.py backbone=resnet101_gn dilation=true
python train.py -m backbone=resnet50,resnet101 position=sine,learned
python train.py ckpt_path=outputs/<run>/checkpoints/last.ckpt    # resume, in the run's own folder
python train.py -m hparams_search=detr_optuna                    # Optuna search, conf/hparams_search/
python train.py debug=fdr                                        # a debug preset, conf/debug/
"""

import sys

from detr_backbone.commands.train import main

if __name__ == "__main__":
    main(sys.argv[1:])
