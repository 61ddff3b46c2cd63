"""The phase services, one package each; they import shared/, never the reverse."""
import shared  # noqa: F401  before any phase loads torch: it sets the OpenMP wait policy (see there)
