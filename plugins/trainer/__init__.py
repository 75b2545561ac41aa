"""``remora trainer``: fit the learned scorer's cost model on the schedulers' download history."""
