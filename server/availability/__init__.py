"""Clinicians' availability: hours, absences, holidays, on-call."""
