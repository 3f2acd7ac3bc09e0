"""The front: the public doors (`attention`, `attention_weights`, `attention_stats`, `which_backend`) and
`run`, the one path from a checked call to a backend that every layer above enters."""
