package meta

import (
	"context"
	"errors"
	"time"
)

// FollowConfig configures Follow.
type FollowConfig struct {
	Catalog *Catalog
	// Node is the node whose doorbells are followed.
	Node string
	// Resync is how often Full runs again (a safety net: nodes the
	// records do not name hear of their changes this way).
	Resync time.Duration
	// Full lists every record and applies what changed (at start and
	// every Resync).
	Full func(ctx context.Context) error
	// Changed applies the record of name, whose doorbell rang; it says
	// whether the record still concerns the node (when not, the bell is
	// removed).
	Changed func(ctx context.Context, name string) (concerned bool, err error)
	// Result is told of every round's outcome (nil: all applied), and
	// Follow waits with backoff after an error (1 s doubling to 30 s).
	Result func(err error)
}

// Follow keeps a node in line with the records that concern it until ctx
// ends: Full at start and every Resync, and in between Changed for each
// record whose doorbell rang (one blocking query on the node's doorbells).
// A round that fails is retried whole; a record applied is not applied
// again until its bell rings again.
func Follow(ctx context.Context, cfg FollowConfig) {
	seen := map[string]uint64{}
	var lastFull time.Time
	backoff := time.Second
	fail := func(err error) {
		cfg.Result(err)
		if ctx.Err() == nil {
			sleepCtx(ctx, backoff)
			backoff = min(2*backoff, 30*time.Second)
		}
	}
	for ctx.Err() == nil {
		bells, next, err := cfg.Catalog.Doorbells(ctx, cfg.Node)
		if err != nil {
			fail(err)
			continue
		}
		if lastFull.IsZero() || time.Since(lastFull) > cfg.Resync {
			// The bells first: one that rings during the listing is newer
			// than what was read, and is followed in the next round.
			if err := cfg.Full(ctx); err != nil {
				fail(err)
				continue
			}
			lastFull = time.Now()
			clear(seen)
			for name, mi := range bells {
				seen[name] = mi
			}
		}
		var errs []error
		for name, mi := range bells {
			if seen[name] == mi {
				continue
			}
			concerned, err := cfg.Changed(ctx, name)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			seen[name] = mi
			if !concerned {
				// Not named by the record any more (or deleted): the bell
				// goes, unless it rang again meanwhile.
				if err := cfg.Catalog.ForgetDoorbell(ctx, cfg.Node, name, mi); err == nil {
					delete(seen, name)
				}
			}
		}
		for name := range seen {
			if _, ok := bells[name]; !ok {
				delete(seen, name)
			}
		}
		if err := errors.Join(errs...); err != nil {
			fail(err)
			continue
		}
		cfg.Result(nil)
		backoff = time.Second
		if _, err := cfg.Catalog.WatchDoorbells(ctx, cfg.Node, next); err != nil {
			fail(err)
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
