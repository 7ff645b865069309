package cli

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/ukai-storage/ukai/api"
)

// nodeOpCmds are cordon, uncordon and drain.
func (a *app) nodeOpCmds() []*cobra.Command {
	var cordonMove bool
	cordon := &cobra.Command{
		Use:   "cordon NODE [--move-owners]",
		Short: "Place no new copy or ownership on NODE (its copies stay; see drain); --move-owners hands its images to other nodes now",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			op, err := a.client().CordonNode(cmd.Context(), args[0], api.CordonRequest{Cordoned: true, MoveOwners: cordonMove})
			if err != nil {
				return fmt.Errorf("node cordon %s: %w", args[0], err)
			}
			if asked, err := printIfAsked(cmd, a.out, op); asked {
				return err
			}
			fmt.Fprintf(a.out, "%s cordoned: no new copy or owner goes there\n", args[0])
			if n := printOwners(a.out, op, "moved to", "not moved"); n > 0 {
				return fmt.Errorf("node cordon %s: %d owners not moved (the node is cordoned)", args[0], n)
			}
			return nil
		},
	}
	cordon.Flags().BoolVar(&cordonMove, "move-owners", false, "hand the images NODE owns to other nodes now (uncordon hands them back)")
	uncordon := &cobra.Command{
		Use:   "uncordon NODE",
		Short: "Let copies go to NODE again; stops a drain (the copies it moved stay) and hands back the owners it moved",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			op, err := a.client().CordonNode(cmd.Context(), args[0], api.CordonRequest{})
			if err != nil {
				return fmt.Errorf("node uncordon %s: %w", args[0], err)
			}
			if asked, err := printIfAsked(cmd, a.out, op); asked {
				return err
			}
			fmt.Fprintf(a.out, "%s uncordoned\n", args[0])
			if n := printOwners(a.out, op, "back on", "not handed back"); n > 0 {
				return fmt.Errorf("node uncordon %s: %d owners not handed back", args[0], n)
			}
			return nil
		},
	}
	var req api.DrainRequest
	var wait bool
	var timeout, every time.Duration
	var output string
	drain := &cobra.Command{
		Use:   "drain NODE [--wait] [--now] [--move-owners]",
		Short: "Move every copy off NODE (keeping replica counts and label rules, within sync windows and caps unless --now)",
		Long: `Move every copy off NODE: each image with a copy there gets a new copy on
another node chosen by its placement rules; once that copy is in sync the
one on NODE is removed. The node is cordoned meanwhile (and stays so until
'ukai node uncordon'). A drain that could not finish (no eligible node, an
image whose exact locations name NODE, ...) is refused with the images
named, and nothing changes. The last in-sync copy of a block is never
removed: an image whose other copies cannot be synchronized waits.

Images NODE owns (their VMs run there) keep their owner until the VM moves,
or are handed to another node at once with --move-owners (uncordon hands
them back).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutputJSON(output); err != nil {
				return err
			}
			if timeout > 0 && !wait {
				return fmt.Errorf("--timeout needs --wait")
			}
			if every <= 0 {
				return fmt.Errorf("--interval %s: must be positive", every)
			}
			op, err := a.client().DrainNode(cmd.Context(), args[0], req)
			if err != nil {
				return fmt.Errorf("node drain %s: %w", args[0], err)
			}
			ownerErr := func() error {
				if len(op.OwnerErrors) > 0 {
					return fmt.Errorf("node drain %s: %d owners not moved (the drain goes on)", args[0], len(op.OwnerErrors))
				}
				return nil
			}
			if output == "json" && !wait {
				if err := printJSON(a.out, op); err != nil {
					return err
				}
				return ownerErr()
			}
			// With -o json the progress goes to stderr, the final state to
			// stdout.
			progress := a.out
			if output == "json" {
				progress = cmd.ErrOrStderr()
			}
			fmt.Fprintf(progress, "%s draining: %d %s to move\n", args[0], op.Total-op.Done, plural(op.Total-op.Done, "image", "images"))
			printOwners(progress, op, "moved to", "not moved")
			started := op
			if !wait {
				return ownerErr()
			}
			ctx := cmd.Context()
			if timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, timeout)
				defer cancel()
			}
			op, err = a.waitDrain(ctx, progress, args[0], every)
			if output == "json" && op.Node != "" {
				op.Moved, op.OwnerErrors = started.Moved, started.OwnerErrors
				if perr := printJSON(a.out, op); perr != nil {
					return perr
				}
			}
			if err != nil {
				return err
			}
			op = started
			return ownerErr()
		},
	}
	f := drain.Flags()
	f.BoolVar(&req.Now, "now", false, "ignore sync windows and rate caps for the drain's copies")
	f.BoolVar(&req.MoveOwners, "move-owners", false, "hand the images NODE owns to other nodes now (their I/O is forwarded there)")
	f.BoolVar(&wait, "wait", false, "wait until NODE holds no copy, printing progress")
	f.DurationVar(&timeout, "timeout", 0, "with --wait: give up after this long (exit status 1, the drain goes on)")
	f.DurationVar(&every, "interval", 2*time.Second, "with --wait: how often to check")
	f.StringVarP(&output, "output", "o", "table", "output format: table or json (the final state)")
	return []*cobra.Command{cordon, uncordon, drain}
}

// waitDrain follows a drain until node holds no copy, printing a line
// whenever the progress changes.
func (a *app) waitDrain(ctx context.Context, w io.Writer, node string, every time.Duration) (api.NodeOperation, error) {
	var last string
	// The rate is the bytes done since the most bytes were left, over
	// the time since: the bytes left fall in steps (the block maps in the
	// catalog are updated in batches), which a rate between two samples
	// turns into spikes.
	var peak int64 = -1
	var peakAt time.Time
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		op, err := a.client().NodeOperation(ctx, node)
		if err != nil {
			return op, fmt.Errorf("node drain %s: %w", node, err)
		}
		if !op.Draining {
			return op, fmt.Errorf("node drain %s: the drain was stopped (uncordoned)", node)
		}
		now := time.Now()
		if op.BytesLeft > peak {
			peak, peakAt = op.BytesLeft, now
		}
		var rate float64
		if d := now.Sub(peakAt).Seconds(); d > 0 && peak > op.BytesLeft {
			rate = float64(peak-op.BytesLeft) / d
		}
		line := drainLine(op, rate)
		switch {
		case isTerminal(w):
			// A bar redrawn in place; the images waiting are listed at
			// the end (or on interrupt).
			fmt.Fprintf(w, "\r%s %s   ", bar(int64(op.Done), int64(op.Total)), line)
			if op.Done >= op.Total && len(op.Images) == 0 {
				fmt.Fprintln(w)
			}
		case line != last:
			fmt.Fprintln(w, line)
			last = line
		}
		if op.Done >= op.Total && len(op.Images) == 0 {
			fmt.Fprintf(w, "%s drained: it holds no copy\n", node)
			return op, nil
		}
		select {
		case <-ctx.Done():
			printDrainImages(w, op)
			return op, fmt.Errorf("node drain %s: still %d %s to move: %w", node, len(op.Images), plural(len(op.Images), "image", "images"), ctx.Err())
		case <-t.C:
		}
	}
}

// printOwners prints the owners an operation moved ("  vm1: owner moved
// to n2") and those it could not; it returns how many it could not.
func printOwners(w io.Writer, op api.NodeOperation, moved, failed string) int {
	for _, img := range sortedKeys(op.Moved) {
		fmt.Fprintf(w, "  %s: owner %s %s\n", img, moved, op.Moved[img])
	}
	for _, e := range op.OwnerErrors {
		fmt.Fprintf(w, "  owner %s: %s\n", failed, e)
	}
	return len(op.OwnerErrors)
}

func drainLine(op api.NodeOperation, rate float64) string {
	s := fmt.Sprintf("%s: %d/%d images done, %s left", op.Node, op.Done, op.Total, FormatSize(op.BytesLeft))
	if rate > 0 {
		s += fmt.Sprintf(", %s/s", FormatSize(int64(rate)))
		if op.BytesLeft > 0 {
			s += ", ETA " + time.Duration(float64(op.BytesLeft)/rate*float64(time.Second)).Round(time.Second).String()
		}
	}
	var blocked []string
	for _, img := range op.Images {
		if img.Blocked != "" {
			blocked = append(blocked, img.Name+": "+img.Blocked)
		}
	}
	if len(blocked) > 0 {
		s += "; blocked: " + strings.Join(blocked, "; ")
	}
	return s
}

func printDrainImages(w io.Writer, op api.NodeOperation) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IMAGE\tLEFT\tSTATE")
	for _, img := range op.Images {
		state := "moving"
		switch {
		case img.Blocked != "":
			state = "blocked: " + img.Blocked
		case img.Waiting != "":
			state = "waiting: " + img.Waiting
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", img.Name, FormatSize(img.BytesLeft), state)
	}
	tw.Flush()
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

func (a *app) groupCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "group", Short: "Groups of images whose copies follow one rule (affinity, anti-affinity on a label)"}
	var aff, anti, listOut string
	set := &cobra.Command{
		Use:   "set NAME --affinity LABEL | --anti-affinity LABEL",
		Short: "Set a group's rule: affinity (copies prefer the label value the group's others have) or anti-affinity (every copy of the group on a distinct value)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			g := api.Group{Name: args[0]}
			switch {
			case aff != "" && anti != "":
				return fmt.Errorf("give --affinity or --anti-affinity, not both")
			case aff != "":
				g.Kind, g.Label = "affinity", aff
			case anti != "":
				g.Kind, g.Label = "anti-affinity", anti
			default:
				return fmt.Errorf("give --affinity LABEL or --anti-affinity LABEL")
			}
			out, err := a.client().SetGroup(cmd.Context(), g)
			if err != nil {
				return fmt.Errorf("group set %s: %w", args[0], err)
			}
			fmt.Fprintf(a.out, "group %s: %s by %s\n", out.Name, out.Kind, out.Label)
			return nil
		},
	}
	set.Flags().StringVar(&aff, "affinity", "", "label key (e.g. rack): new copies prefer the value most of the group's copies have")
	set.Flags().StringVar(&anti, "anti-affinity", "", "label key (e.g. host): every copy of every image of the group on a distinct value")
	list := &cobra.Command{
		Use:   "list",
		Short: "List the groups, their rules and images",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(listOut); err != nil {
				return err
			}
			gs, err := a.client().Groups(cmd.Context())
			if err != nil {
				return fmt.Errorf("group list: %w", err)
			}
			if listOut != "table" {
				return printAs(a.out, listOut, gs)
			}
			tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tRULE\tLABEL\tIMAGES")
			for _, g := range gs {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", g.Name, g.Kind, g.Label, dash(strings.Join(g.Images, ",")))
			}
			return tw.Flush()
		},
	}
	list.Flags().StringVarP(&listOut, "output", "o", "table", "output format: table, json or yaml")
	del := &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a group without images",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := a.client().DeleteGroup(cmd.Context(), args[0]); err != nil {
				return fmt.Errorf("group delete %s: %w", args[0], err)
			}
			fmt.Fprintf(a.out, "group %s deleted\n", args[0])
			return nil
		},
	}
	cmd.AddCommand(set, list, del)
	return cmd
}
