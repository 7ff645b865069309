// Package ratelog lets a log line through at most once per interval and
// counts the ones it held back, so that a flood of refused connections
// or requests cannot flood the log.
package ratelog

import (
	"sync"
	"time"
)

// Limiter passes one event per Every. The zero value with Every set is
// ready to use; it is safe for concurrent use.
type Limiter struct {
	Every time.Duration

	mu     sync.Mutex
	last   time.Time
	missed int
}

// Allow reports whether the event at now may be logged, and how many
// were held back since the last one that was.
func (l *Limiter) Allow(now time.Time) (missed int, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() && now.Sub(l.last) < l.Every {
		l.missed++
		return 0, false
	}
	missed, l.missed, l.last = l.missed, 0, now
	return missed, true
}
