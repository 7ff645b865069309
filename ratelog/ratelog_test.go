package ratelog

import (
	"testing"
	"time"
)

func TestLimiter(t *testing.T) {
	l := Limiter{Every: time.Second}
	t0 := time.Unix(1000, 0)
	if n, ok := l.Allow(t0); !ok || n != 0 {
		t.Fatalf("first event: %d %v, want let through", n, ok)
	}
	for i := 1; i <= 3; i++ {
		if _, ok := l.Allow(t0.Add(time.Duration(i) * 100 * time.Millisecond)); ok {
			t.Fatalf("event %d within the interval let through", i)
		}
	}
	if n, ok := l.Allow(t0.Add(time.Second)); !ok || n != 3 {
		t.Fatalf("event after the interval: %d %v, want let through with 3 held back", n, ok)
	}
}
