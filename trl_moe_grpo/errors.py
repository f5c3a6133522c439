"""The one exception type of the package: every message names the problem and what to do about it."""


class MoEGRPOError(ValueError):
    """Raised for input the MoE-GRPO machinery cannot use (a dense model, an unknown router, a bad trace...).

    It subclasses `ValueError` so code that already catches configuration errors from TRL keeps working.
    """
