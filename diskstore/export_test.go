package diskstore

// WithCaps sets the caps on topic records, 2^20 in all and 8,192 without
// a message by default, so that tests reach them quickly.
func WithCaps(topics, empty int) Option {
	return func(c *config) { c.maxTopics, c.maxEmpty = topics, empty }
}
