package meta

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Target port numbers. Every node is one iSCSI target portal group and one
// SCSI target port group to initiators (multipath with ALUA: a path per
// node, docs/hypervisor.md); both need a 16-bit number that no other node
// of the cluster uses, the same on every path and for the node's life.
// Names do not hash into 16 bits without collisions (hundreds of nodes
// collide with even odds), so numbers are handed out by the store, once
// per node: <prefix>ports/<number> holds the node's name, created with
// check-and-set (a number two nodes race for goes to one). Numbers are
// never reused: a node that is gone keeps its number (65,535 node names
// in a cluster's life is far more than it will see).

func (c *Catalog) portPrefix() string { return c.prefix + "ports/" }

// MaxPortNumber is the highest target port number (16 bits; 0 is
// reserved by SCSI).
const MaxPortNumber = 1<<16 - 1

// PortNumber returns node's target port number, allocating the lowest free
// one on its first call. The caller keeps it (the node caches it in its
// data dir): the answer never changes.
func (c *Catalog) PortNumber(ctx context.Context, node string) (uint16, error) {
	if !NodeNameRE.MatchString(node) {
		return 0, fmt.Errorf("target port number: %q is not a node name", node)
	}
	for range maxCASRetries {
		entries, _, err := c.kv.List(ctx, c.portPrefix())
		if err != nil {
			return 0, fmt.Errorf("list the target port numbers: %w", err)
		}
		used := make(map[int]bool, len(entries))
		for _, e := range entries {
			num, err := strconv.Atoi(strings.TrimPrefix(e.Key, c.portPrefix()))
			if err != nil || num < 1 || num > MaxPortNumber {
				// Not one of ours: never handed out, never in the way.
				c.reportMalformed(e.Key, fmt.Errorf("not a target port number"))
				continue
			}
			used[num] = true
			if string(e.Value) == node {
				return uint16(num), nil
			}
		}
		free := 0
		for i := 1; i <= MaxPortNumber; i++ {
			if !used[i] {
				free = i
				break
			}
		}
		if free == 0 {
			return 0, fmt.Errorf("target port number for %s: all %d numbers are taken", node, MaxPortNumber)
		}
		err = c.kv.CAS(ctx, c.portPrefix()+strconv.Itoa(free), []byte(node), 0)
		if err == nil {
			return uint16(free), nil
		}
		if !errors.Is(err, ErrConflict) {
			return 0, fmt.Errorf("take target port number %d for %s: %w", free, node, err)
		}
		// Another node took it first: read again.
	}
	return 0, fmt.Errorf("target port number for %s: too much contention: %w", node, ErrConflict)
}

// ErrPortTaken: a node's cached target port number is held by another
// node in the store.
var ErrPortTaken = errors.New("target port number held by another node")

// ClaimPortNumber checks a node's cached number against the store: held by
// the node, fine; free (a store restored from before the node's first
// start, or wiped), taken for it again; held by another node (a data dir
// copied from another node, a node renamed), ErrPortTaken: two nodes with
// one number would be one target port to initiators.
func (c *Catalog) ClaimPortNumber(ctx context.Context, node string, num uint16) error {
	if num == 0 {
		return fmt.Errorf("target port number 0 is reserved")
	}
	key := c.portPrefix() + strconv.Itoa(int(num))
	e, err := c.kv.Get(ctx, key)
	switch {
	case errors.Is(err, ErrNotFound):
		if err := c.kv.CAS(ctx, key, []byte(node), 0); err != nil {
			if errors.Is(err, ErrConflict) {
				return c.ClaimPortNumber(ctx, node, num)
			}
			return fmt.Errorf("claim target port number %d: %w", num, err)
		}
		return nil
	case err != nil:
		return fmt.Errorf("read target port number %d: %w", num, err)
	case string(e.Value) != node:
		return fmt.Errorf("%w: number %d is %q's in the store, not %s's", ErrPortTaken, num, e.Value, node)
	}
	return nil
}
