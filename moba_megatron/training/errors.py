"""The job's error: a flag it cannot run with, a checkpoint it cannot load, a run that must stop.
Library code raises it, naming the problem and the fix; the entry points (moba-pretrain, the needle
eval) print it as one line and exit non-zero."""


from contextlib import contextmanager


class JobError(ValueError):
    pass


@contextmanager
def one_line_errors(prog: str):
    """An entry point's body: a JobError inside ends the process with ``PROG: error: ...``."""
    try:
        yield
    except JobError as e:
        raise SystemExit(f"{prog}: error: {e}") from None
