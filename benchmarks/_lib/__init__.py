"""What the science benchmarks share (late_phase.py, late_phase_mnist.py, frontier.py, hessian*.py,
ddp_train.py): data, models, measurements, the multiprocess task runner, the late-phase training
loop and its checkpoints, the experiments' task graphs, reports and plots.

Scripts put benchmarks/ on ``sys.path`` and import ``_lib.<module>``; nothing here imports a script.
Machine description, timing and result files come from benchmarks/_common.py (shared with the
timing scripts).
"""
