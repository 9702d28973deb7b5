"""SLOs, error budgets, burn-rate alerts and retrain webhooks (see the SLO issue)."""
