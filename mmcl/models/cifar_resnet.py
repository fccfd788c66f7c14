"""The CIFAR-stem ResNet tower and split BatchNorm under their original import path; they live in
mmcl.models.towers.vision and mmcl.models.batchnorm."""
from mmcl.models.batchnorm import SplitBatchNorm2d, convert_split_batchnorm
from mmcl.models.towers.vision import CIFAR10_MEAN, CIFAR10_STD, CIFAR_RESNETS, CifarResNetTower

__all__ = ["CifarResNetTower", "SplitBatchNorm2d", "convert_split_batchnorm", "CIFAR_RESNETS", "CIFAR10_MEAN",
           "CIFAR10_STD"]
