package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/ukai-storage/ukai/api"
)

// errNeedsOperator makes `ukai status` exit non-zero (after printing) when
// something needs an operator.
var errNeedsOperator = errors.New("the cluster needs an operator (see the problems above)")

func (a *app) statusCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the cluster's health on one screen; exit 1 when something needs an operator",
		Long: `Show the cluster's health as the node --api points at sees it: nodes by state,
images (degraded: fewer copies in sync on live nodes than wanted; unavailable:
a block without an in-sync copy on a live node; ownerless: attached to or
owned by a node that is not alive), the data not in sync and how long the
copies take at the nodes' caps, and what the planner is doing. The exit
code is 0 when healthy and 1 when something needs an operator, for scripts
and monitors.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutputJSON(output); err != nil {
				return err
			}
			st, err := a.client().Status(cmd.Context())
			if err != nil {
				return fmt.Errorf("status: %w", err)
			}
			if output == "json" {
				if err := printJSON(a.out, st); err != nil {
					return err
				}
			} else {
				printStatus(a.out, st)
			}
			if !st.Healthy {
				return errNeedsOperator
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	return cmd
}

func printStatus(w io.Writer, st api.ClusterStatus) {
	health := "HEALTHY"
	if !st.Healthy {
		health = fmt.Sprintf("NEEDS AN OPERATOR (%d problems)", len(st.Problems))
	}
	fmt.Fprintf(w, "cluster: %s (as node %s sees it, %s)\n", health, st.Node, st.Time.Format("15:04:05"))
	n := st.Nodes
	fmt.Fprintf(w, "nodes:   %d total: %d alive", n.Total, n.Alive)
	for _, p := range []struct {
		n    int
		what string
	}{{n.Suspect, "suspect"}, {n.Dead, "dead"}, {n.Left, "left"}, {n.Cordoned, "cordoned"}, {n.Draining, "draining"}} {
		if p.n > 0 {
			fmt.Fprintf(w, ", %d %s", p.n, p.what)
		}
	}
	fmt.Fprintln(w)
	im := st.Images
	fmt.Fprintf(w, "images:  %d total (%d snapshots): %d degraded, %d unavailable, %d ownerless\n", im.Total, im.Snapshots, im.Degraded, im.Unavailable, im.Ownerless)
	eta := "nothing to copy"
	switch {
	case st.OutOfSyncBytes > 0 && st.BacklogETASec < 0:
		eta = "ETA unknown (uncapped, a paused sync, or waiting for a dead node's copies to be replaced)"
	case st.OutOfSyncBytes > 0:
		eta = "ETA " + (time.Duration(st.BacklogETASec * float64(time.Second))).Round(time.Second).String() + " at the nodes' caps"
	}
	fmt.Fprintf(w, "sync:    %s not in sync; %s\n", FormatSize(st.OutOfSyncBytes), eta)
	if len(st.Activity) == 0 {
		fmt.Fprintln(w, "planner: idle")
	} else {
		kinds := make([]string, 0, len(st.Activity))
		for k := range st.Activity {
			kinds = append(kinds, k)
		}
		sort.Strings(kinds)
		var parts []string
		for _, k := range kinds {
			parts = append(parts, fmt.Sprintf("%s %d", strings.ReplaceAll(k, "_", " "), st.Activity[k]))
		}
		fmt.Fprintf(w, "planner: %s\n", strings.Join(parts, ", "))
	}
	if len(st.Problems) > 0 {
		fmt.Fprintln(w, "problems:")
		for _, p := range st.Problems {
			subject := p.Image
			if subject == "" {
				subject = p.Node
			}
			if subject != "" {
				subject += ": "
			}
			fmt.Fprintf(w, "  %-11s %s%s\n", p.Kind, subject, p.Detail)
		}
	}
}

func (a *app) imageIostatCmd() *cobra.Command {
	var output string
	var interval time.Duration
	var count, top int
	cmd := &cobra.Command{
		Use:   "iostat",
		Short: "Show the busiest images across the cluster (IOPS, throughput, latency), refreshed every second",
		Long: `Samples every live node's per-image I/O counters once per interval and
shows, from two samples, the images with the most operations per second across the cluster:
read and write IOPS, throughput, mean latency, and the owner. On a
terminal the screen is redrawn until interrupted (or --count samples);
otherwise one table per interval is printed. -o json prints one sample.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutputJSON(output); err != nil {
				return err
			}
			if interval < 100*time.Millisecond {
				return fmt.Errorf("--interval %v: at least 100ms", interval)
			}
			if output == "json" && count == 0 {
				count = 1
			}
			ctx := cmd.Context()
			c := a.client()
			prev, err := a.sampleIO(ctx, c)
			if err != nil {
				return err
			}
			tty := isTerminal(a.out)
			for i := 0; count == 0 || i < count; i++ {
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(interval):
				}
				cur, err := a.sampleIO(ctx, c)
				if err != nil {
					return err
				}
				rows := ioRates(prev, cur)
				prev = cur
				var frozen []string
				for name, st := range cur.nodes {
					if !st.Counting {
						frozen = append(frozen, name)
					}
				}
				sort.Strings(frozen)
				if top > 0 && len(rows) > top {
					rows = rows[:top]
				}
				note := ""
				if len(frozen) > 0 {
					note = fmt.Sprintf("not counted: the I/O through %s (api.metrics_io false)", strings.Join(frozen, ", "))
				}
				if output == "json" {
					if note != "" {
						fmt.Fprintln(cmd.ErrOrStderr(), "warning:", note)
					}
					if err := printJSON(a.out, rows); err != nil {
						return err
					}
					continue
				}
				if tty {
					fmt.Fprint(a.out, "\033[H\033[2J") // home, clear
				}
				printIO(a.out, rows, time.Now())
				if note != "" {
					fmt.Fprintln(a.out, note)
				}
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json (json: one sample unless --count)")
	cmd.Flags().DurationVar(&interval, "interval", time.Second, "time between samples")
	cmd.Flags().IntVar(&count, "count", 0, "stop after this many samples (0: until interrupted)")
	cmd.Flags().IntVar(&top, "top", 20, "show at most this many images (0: all)")
	return cmd
}

// ioSample is every live node's counters, by node.
type ioSample struct {
	at    time.Time
	nodes map[string]api.IOStat
}

// sampleIO asks every live node for its counters, in parallel. A node that
// does not answer is left out of this sample (its images show less).
func (a *app) sampleIO(ctx context.Context, c *api.Client) (ioSample, error) {
	nodes, err := c.ListNodes(ctx)
	if err != nil {
		return ioSample{}, fmt.Errorf("iostat: list nodes: %w", err)
	}
	s := ioSample{at: time.Now(), nodes: map[string]api.IOStat{}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, n := range nodes {
		if n.State != "alive" || n.APIAddr == "" {
			continue
		}
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			st, err := c.For(n.APIAddr).IOStat(cctx)
			if err != nil || st.Node != n.Name {
				return // not this node's answer (a wildcard address reaching another)
			}
			mu.Lock()
			s.nodes[n.Name] = st
			mu.Unlock()
		})
	}
	wg.Wait()
	if len(s.nodes) == 0 {
		return s, errors.New("iostat: no node answered")
	}
	return s, nil
}

// IORow is one image's rates over a sample interval, summed over nodes.
type IORow struct {
	Image       string  `json:"image"`
	Owner       string  `json:"owner,omitempty"`
	ReadIOPS    float64 `json:"read_iops"`
	WriteIOPS   float64 `json:"write_iops"`
	ReadBps     float64 `json:"read_bytes_per_sec"`
	WriteBps    float64 `json:"write_bytes_per_sec"`
	ReadLatMs   float64 `json:"read_latency_ms"`
	WriteLatMs  float64 `json:"write_latency_ms"`
	ErrorsPerS  float64 `json:"errors_per_sec"`
	IntervalSec float64 `json:"interval_sec"`
}

// ioRates turns two samples into per-image rates, busiest first. A node's
// counters that went down (it restarted) count from zero.
func ioRates(prev, cur ioSample) []IORow {
	rows := map[string]*IORow{}
	var sec float64
	for node, st := range cur.nodes {
		p, had := prev.nodes[node]
		if !had {
			continue // no earlier sample: its counters since start are no rate
		}
		old := map[string]api.ImageIO{}
		for _, io := range p.Images {
			old[io.Image] = io
		}
		sec = max(sec, st.Time.Sub(p.Time).Seconds())
		for _, io := range st.Images {
			o := old[io.Image]
			if io.ReadOps < o.ReadOps || io.WriteOps < o.WriteOps {
				o = api.ImageIO{}
			}
			r := rows[io.Image]
			if r == nil {
				r = &IORow{Image: io.Image}
				rows[io.Image] = r
			}
			if io.Owner != "" {
				r.Owner = io.Owner
			}
			r.ReadIOPS += float64(io.ReadOps - o.ReadOps)
			r.WriteIOPS += float64(io.WriteOps - o.WriteOps)
			r.ReadBps += float64(io.ReadBytes - o.ReadBytes)
			r.WriteBps += float64(io.WriteBytes - o.WriteBytes)
			r.ReadLatMs += float64(io.ReadNanos-o.ReadNanos) / 1e6
			r.WriteLatMs += float64(io.WriteNanos-o.WriteNanos) / 1e6
			r.ErrorsPerS += float64(io.Errors - o.Errors)
		}
	}
	if sec <= 0 {
		sec = cur.at.Sub(prev.at).Seconds()
	}
	out := make([]IORow, 0, len(rows))
	for _, r := range rows {
		if r.ReadIOPS > 0 {
			r.ReadLatMs /= r.ReadIOPS // summed latency over ops: the mean
		}
		if r.WriteIOPS > 0 {
			r.WriteLatMs /= r.WriteIOPS
		}
		r.ReadIOPS, r.WriteIOPS, r.ReadBps, r.WriteBps, r.ErrorsPerS = r.ReadIOPS/sec, r.WriteIOPS/sec, r.ReadBps/sec, r.WriteBps/sec, r.ErrorsPerS/sec
		r.IntervalSec = sec
		out = append(out, *r)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i].ReadIOPS+out[i].WriteIOPS, out[j].ReadIOPS+out[j].WriteIOPS
		if a != b {
			return a > b
		}
		return out[i].Image < out[j].Image
	})
	return out
}

func printIO(w io.Writer, rows []IORow, at time.Time) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(w, "ukai image iostat  %s\n", at.Format("15:04:05"))
	fmt.Fprintln(tw, "IMAGE\tOWNER\tRD IOPS\tWR IOPS\tRD/s\tWR/s\tRD LAT\tWR LAT\tERR/s\t")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%.0f\t%.0f\t%s\t%s\t%s\t%s\t%.0f\t\n", r.Image, dash(r.Owner), r.ReadIOPS, r.WriteIOPS,
			FormatSize(int64(r.ReadBps)), FormatSize(int64(r.WriteBps)), latency(r.ReadLatMs, r.ReadIOPS), latency(r.WriteLatMs, r.WriteIOPS), r.ErrorsPerS)
	}
	tw.Flush()
	if len(rows) == 0 {
		fmt.Fprintln(w, "(no I/O)")
	}
}

func latency(ms, iops float64) string {
	if iops == 0 {
		return "-"
	}
	if ms < 1 {
		return fmt.Sprintf("%.0fµs", ms*1000)
	}
	return fmt.Sprintf("%.1fms", ms)
}
