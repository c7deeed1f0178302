package diskstore

// WithCaps sets the caps on topic records, 2^20 in all and 8,192 without
// a message by default, so that tests reach them quickly.
func WithCaps(topics, empty int) Option {
	return func(c *config) { c.maxTopics, c.maxEmpty = topics, empty }
}

// WithDedupeCap sets the cap on request ids on disk, 131,072 by default.
func WithDedupeCap(n int) Option {
	return func(c *config) { c.dedupeKeys = n }
}
