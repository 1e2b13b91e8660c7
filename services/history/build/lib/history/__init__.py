"""chargegate history: records sessions, control actions and a 1-minute time series; keeps the charging modes."""
