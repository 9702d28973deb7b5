"""The attached training runner: re-distils a student when kdwatch asks (retrain webhooks)."""
