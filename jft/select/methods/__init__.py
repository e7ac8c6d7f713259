"""Selection methods, one per file; importing the package registers them all."""

from jft.select.methods import (  # noqa: F401
    dedup,
    got_d,
    ifd,
    kmq,
    less,
    perplexity,
    random_subset,
)
from jft.select.methods.base import METHODS, Context, Selection, get_method  # noqa: F401
