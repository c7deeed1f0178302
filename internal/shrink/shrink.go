// Package shrink gives a map's space back after a crowd has gone. A Go
// map never shrinks: one that held a million entries keeps room for them
// when it holds ten. Maps that grow with what clients do (conns, topics,
// users, history records) are rebuilt at their size once they hold under a
// quarter of their peak, which costs O(1) amortized per delete.
package shrink

// minPeak is the size below which a map is never rebuilt: small maps cost
// little, and a rebuild would be churn.
const minPeak = 4096

// Peak tracks the largest size a map reached since it was last rebuilt.
// The zero value is ready to use. It is not safe for concurrent use: the
// map's own lock guards it.
type Peak struct{ n int }

// Grew notes that the map holds n entries now.
func (p *Peak) Grew(n int) { p.n = max(p.n, n) }

// Map returns m, or a copy of it that holds only the room its entries need
// when it holds under a quarter of its peak; the caller replaces m with
// the result.
func Map[K comparable, V any](m map[K]V, p *Peak) map[K]V {
	if p.n < minPeak || len(m) >= p.n/4 {
		return m
	}
	c := make(map[K]V, len(m))
	for k, v := range m {
		c[k] = v
	}
	p.n = len(m)
	return c
}
