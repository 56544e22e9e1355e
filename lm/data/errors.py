"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """A data file or data setting that cannot be used.

    Messages name the file (and line, where there is one) and say what was expected, so a user
    can fix the input without reading the code. Raised before any long work starts.
    """
