package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/ukai-storage/ukai/api"
)

func (a *app) locationCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "location", Short: "Add or remove the copies of an image"}
	cmd.AddCommand(&cobra.Command{
		Use:   "add IMAGE NODE",
		Short: "Add a copy of IMAGE on NODE; it starts out of sync and is filled by sync",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			img, err := a.client().AddLocation(cmd.Context(), args[0], args[1])
			if err != nil {
				return fmt.Errorf("add location %s to %s: %w", args[1], args[0], err)
			}
			if asked, err := printIfAsked(cmd, a.out, img); asked {
				return err
			}
			fmt.Fprintf(a.out, "%s is now a location of %s (%s)\n", args[1], img.Name, locSummary(img))
			return nil
		},
	}, &cobra.Command{
		Use:   "remove IMAGE NODE",
		Short: "Remove NODE's copy of IMAGE (refused if it holds the last in-sync copy of a block)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			img, err := a.client().RemoveLocation(cmd.Context(), args[0], args[1])
			if err != nil {
				return fmt.Errorf("remove location %s from %s: %w", args[1], args[0], err)
			}
			if asked, err := printIfAsked(cmd, a.out, img); asked {
				return err
			}
			fmt.Fprintf(a.out, "%s is no longer a location of %s (%s)\n", args[1], img.Name, locSummary(img))
			return nil
		},
	})
	return cmd
}

func locSummary(img api.Image) string {
	var parts []string
	for _, l := range img.Locations {
		parts = append(parts, fmt.Sprintf("%s: %d out of sync", l.Node, l.OutOfSync))
	}
	return strings.Join(parts, ", ")
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

func (a *app) imageSyncCmd() *cobra.Command {
	var req api.SyncRequest
	var output string
	cmd := &cobra.Command{
		Use:   "sync IMAGE [--from-block N] [--to-block M] | --pause | --resume",
		Short: "Copy out-of-sync blocks from an in-sync copy (progress on a terminal), or pause/resume the background synchronizer",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutputJSON(output); err != nil {
				return err
			}
			if req.FromBlock < 0 || req.ToBlock < 0 {
				return fmt.Errorf("--from-block and --to-block must not be negative")
			}
			if req.ToBlock != 0 && req.ToBlock <= req.FromBlock {
				return fmt.Errorf("--to-block %d must be greater than --from-block %d", req.ToBlock, req.FromBlock)
			}
			if req.Pause && req.Resume {
				return fmt.Errorf("--pause and --resume exclude each other")
			}
			tty := isTerminal(a.out) && output == "table"
			var final api.SyncProgress
			err := a.client().SyncImage(cmd.Context(), args[0], req, func(p api.SyncProgress) {
				if p.Final {
					final = p
				}
				switch {
				case output == "json":
					printJSON(a.out, p)
				case tty && !p.Final:
					fmt.Fprintf(a.out, "\r%s", progressLine(p))
				}
			})
			if req.Pause || req.Resume {
				if err != nil {
					return fmt.Errorf("sync %s: %w", args[0], err)
				}
				state := map[bool]string{true: "paused", false: "resumed"}[req.Pause]
				fmt.Fprintf(a.out, "background sync of %s %s\n", args[0], state)
				return nil
			}
			if tty {
				fmt.Fprintln(a.out)
			}
			if output == "table" && final.Final {
				fmt.Fprintf(a.out, "synced %s: %d blocks checked, %d copied (%s) in %.1fs at %s/s; %d blocks still out of sync\n",
					args[0], final.Done, final.Copied, FormatSize(final.Bytes), final.ElapsedSec, FormatSize(int64(final.RateBps)), final.OutOfSync)
			}
			if err != nil {
				return fmt.Errorf("sync %s: %w", args[0], err)
			}
			if final.OutOfSync > 0 && req.FromBlock == 0 && req.ToBlock == 0 {
				return errors.New("some blocks are still out of sync (copies on dead nodes are skipped)")
			}
			return nil
		},
	}
	cmd.Flags().Int64Var(&req.FromBlock, "from-block", 0, "first block to sync")
	cmd.Flags().Int64Var(&req.ToBlock, "to-block", 0, "block after the last one to sync (default: the end)")
	cmd.Flags().BoolVar(&req.Pause, "pause", false, "pause the background synchronizer for this image")
	cmd.Flags().BoolVar(&req.Resume, "resume", false, "resume the background synchronizer")
	cmd.Flags().BoolVar(&req.Now, "now", false, "sync even outside the image's sync window (the rate caps still hold)")
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json (one progress object per line)")
	return cmd
}

// progressLine draws a one-line progress bar: blocks, bytes, rate, ETA.
func progressLine(p api.SyncProgress) string {
	const width = 30
	frac := 1.0
	if p.Total > 0 {
		frac = float64(p.Done) / float64(p.Total)
	}
	filled := int(frac * width)
	eta := "-"
	if p.Done > 0 && p.Done < p.Total {
		left := time.Duration(p.ElapsedSec / float64(p.Done) * float64(p.Total-p.Done) * float64(time.Second))
		eta = left.Round(time.Second).String()
	}
	return fmt.Sprintf("[%s%s] %d/%d blocks  %s copied  %s/s  ETA %s   ",
		strings.Repeat("#", filled), strings.Repeat(".", width-filled), p.Done, p.Total,
		FormatSize(p.Bytes), FormatSize(int64(p.RateBps)), eta)
}

func (a *app) imageVerifyCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "verify IMAGE",
		Short: "Compare the checksums of every in-sync copy block by block (non-zero exit on a difference)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutputJSON(output); err != nil {
				return err
			}
			res, err := a.client().VerifyImage(cmd.Context(), args[0])
			if err != nil {
				return fmt.Errorf("verify %s: %w", args[0], err)
			}
			if output == "json" {
				printJSON(a.out, res)
			} else {
				tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
				fmt.Fprintf(tw, "%s: %d blocks, %d compared between at least two in-sync copies, %d differ\n", args[0], res.Blocks, res.Compared, len(res.Mismatches))
				for _, m := range res.Mismatches {
					for node, sum := range m.Sums {
						fmt.Fprintf(tw, "  block %d\t%s\t%s\n", m.Block, node, sum)
					}
				}
				if len(res.Unreachable) > 0 {
					fmt.Fprintf(tw, "unreachable copies (not compared): %s\n", strings.Join(res.Unreachable, ", "))
				}
				tw.Flush()
			}
			if len(res.Mismatches) > 0 {
				return fmt.Errorf("verify %s: %d blocks differ between in-sync copies", args[0], len(res.Mismatches))
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	return cmd
}

func (a *app) imageAttachCmd() *cobra.Command {
	var node string
	cmd := &cobra.Command{
		Use:   "attach IMAGE --node NODE",
		Short: "Make NODE the image's owner now and keep it there until detach (the current owner hands over)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if node == "" {
				return fmt.Errorf("--node is required")
			}
			img, err := a.client().Attach(cmd.Context(), args[0], node)
			if err != nil {
				return fmt.Errorf("attach %s: %w", args[0], err)
			}
			if asked, err := printIfAsked(cmd, a.out, img); asked {
				return err
			}
			fmt.Fprintf(a.out, "%s attached to %s (owner %s, generation %d)\n", img.Name, node, img.Owner, img.Generation)
			return nil
		},
	}
	cmd.Flags().StringVar(&node, "node", "", "node that serves the image's I/O")
	return cmd
}

func (a *app) imageDetachCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "detach IMAGE",
		Short: "Unpin the image's owner (it lets go when idle)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			img, err := a.client().Detach(cmd.Context(), args[0])
			if err != nil {
				return fmt.Errorf("detach %s: %w", args[0], err)
			}
			if asked, err := printIfAsked(cmd, a.out, img); asked {
				return err
			}
			fmt.Fprintf(a.out, "%s detached (owner %s)\n", img.Name, dash(img.Owner))
			return nil
		},
	}
}
