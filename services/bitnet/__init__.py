import shared  # noqa: F401  before anything loads torch: it sets the OpenMP wait policy (passive, see there)
