"""The benchmark models, kept importable as ``models`` for the timing scripts (train_throughput.py,
test_bench_ops.py); they live in ``_lib.models``, which the science scripts import."""

from _lib.models import CIFAR_MODELS, IMAGENET_MODELS, build, imagenet_available  # noqa: F401
