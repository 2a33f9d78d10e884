"""Helpers every test layer shares: devices (``devices``), float64 references (``references``,
``deform_reference``), tolerances (``tolerances``) and the sm_90 compile (``sm90``)."""
