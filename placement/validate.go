package placement

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
)

// ValidatePolicy refuses a policy that can never be met, whatever the
// nodes' health, with every reason found (joined by "; "):
//   - Replicas < 0;
//   - Locations naming an unknown node, or a node twice;
//   - Locations and Replicas both set but len(Locations) != Replicas;
//   - Replicas (or len(Locations)) greater than the number of known nodes;
//   - SpreadBy with fewer distinct values of the label among the known
//     nodes than the copies wanted, or Locations sharing a value or lacking
//     the label;
//   - Relocate without To, To unknown, To == From, From not a location of
//     img, or Relocate together with Locations;
//   - an image Sync policy that does not validate.
//
// Conditions that depend on the moment (a node down, no free candidate)
// are Plan's business: it answers them with Refuse or Wait actions.
func ValidatePolicy(p ImagePolicy, img ImageState, nodes []NodeInfo) error {
	return validatePolicy(p, img, nodes, false)
}

// validatePolicy is ValidatePolicy; inPlan relaxes "From not a location"
// when To already is one (a finished relocation the executor has not yet
// cleared).
func validatePolicy(p ImagePolicy, img ImageState, nodes []NodeInfo, inPlan bool) error {
	var msgs []string
	bad := func(f string, a ...any) { msgs = append(msgs, fmt.Sprintf(f, a...)) }
	known := map[string]NodeInfo{}
	for _, n := range nodes {
		known[n.Name] = n
	}
	if p.Replicas < 0 {
		bad("replicas %d: must be 0 (keep the current count) or more", p.Replicas)
	}
	seen := map[string]bool{}
	for _, l := range p.Locations {
		if _, ok := known[l]; !ok {
			bad("location %s is not a known node", l)
		}
		if seen[l] {
			bad("location %s is listed twice", l)
		}
		seen[l] = true
	}
	if len(p.Locations) > 0 && p.Replicas > 0 && p.Replicas != len(p.Locations) {
		bad("replicas %d disagrees with the %d locations listed", p.Replicas, len(p.Locations))
	}
	want := p.Replicas
	if len(p.Locations) > 0 {
		want = len(p.Locations)
	}
	if want > len(known) {
		bad("%d copies wanted but only %d nodes are known", want, len(known))
	}
	if p.SpreadBy != "" {
		vals := map[string]bool{}
		for _, n := range nodes {
			if v, ok := n.Labels[p.SpreadBy]; ok {
				vals[v] = true
			}
		}
		if want > len(vals) {
			list := make([]string, 0, len(vals))
			for v := range vals {
				list = append(list, v)
			}
			sort.Strings(list)
			bad("spread by %s needs %d distinct values but the known nodes have %d (%s)", p.SpreadBy, want, len(vals), strings.Join(list, ", "))
		}
		byVal := map[string]string{}
		for _, l := range p.Locations {
			n, ok := known[l]
			if !ok {
				continue
			}
			v, has := n.Labels[p.SpreadBy]
			if !has {
				bad("location %s has no %s label (spread by %s)", l, p.SpreadBy, p.SpreadBy)
				continue
			}
			if o, dup := byVal[v]; dup && o != l {
				bad("locations %s and %s share %s %s (spread by %s)", o, l, p.SpreadBy, v, p.SpreadBy)
			}
			byVal[v] = l
		}
	}
	if r := p.Relocate; r != nil {
		switch {
		case r.To == "":
			bad("relocate: no target node")
		default:
			if _, ok := known[r.To]; !ok {
				bad("relocate: target %s is not a known node", r.To)
			}
			if r.To == r.From {
				bad("relocate: target %s is also the source", r.To)
			}
		}
		if r.From != "" && r.From != r.To && !slices.Contains(img.Locations, r.From) {
			if !inPlan || !slices.Contains(img.Locations, r.To) {
				bad("relocate: source %s is not a location of the image", r.From)
			}
		}
		if len(p.Locations) > 0 {
			bad("relocate and locations are both set: change locations instead")
		}
	}
	if img.Sync != nil {
		if err := img.Sync.Validate(); err != nil {
			bad("image sync policy: %v", err)
		}
	}
	if len(msgs) == 0 {
		return nil
	}
	return errors.New(strings.Join(msgs, "; "))
}
