"""kdwatch: fidelity monitoring and SLOs for distilled (student) models against their teachers."""

__version__ = "0.1.0"
