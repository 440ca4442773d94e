"""kopf handlers for DoppelUser; pure reconcile logic kept apart from the kopf glue."""
