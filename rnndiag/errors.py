"""One exception family: the CLI maps every `RnnDiagError` to exit code 2 and one line."""


class RnnDiagError(Exception):
    """Unusable input or options. The message is one line and quotes the user's input."""


class CheckpointError(RnnDiagError):
    """A checkpoint file cannot be read safely or holds no usable state dict."""


class ArchitectureError(RnnDiagError):
    """Tensors that look recurrent do not form a consistent PyTorch RNN/LSTM/GRU."""


class BatchError(RnnDiagError):
    """The batch (file or synthetic settings) does not fit the module being replayed."""


class OptionError(RnnDiagError):
    """A command-line option or option combination is invalid."""


class OutputError(RnnDiagError):
    """A report, picture or export could not be written (a full disk, a missing folder)."""
