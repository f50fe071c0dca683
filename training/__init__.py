"""Model building, export and publishing for scanwatch (training jobs arrive in a later issue)."""
