"""The job's error: a flag it cannot run with, a checkpoint it cannot load, a run that must stop.
Library code raises it, naming the problem and the fix; the entry points (moba-pretrain, the needle
eval) print it as one line and exit non-zero."""


class JobError(ValueError):
    pass
