package cli

import (
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/ukai-storage/ukai/api"
)

func (a *app) snapshotCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "snapshot", Short: "Point-in-time snapshots of images (copy on write), named IMAGE@SNAPSHOT"}
	cmd.AddCommand(a.snapshotCreateCmd(), a.snapshotListCmd(), a.snapshotDeleteCmd(), a.snapshotRevertCmd())
	return cmd
}

// snapshotArgs reads a snapshot named IMAGE@SNAPSHOT (as rbd writes it), or
// as two arguments IMAGE SNAPSHOT.
func snapshotArgs(args []string) (image, snap string, err error) {
	if len(args) == 2 {
		if strings.Contains(args[0], "@") || strings.Contains(args[1], "@") {
			return "", "", fmt.Errorf("name the snapshot either IMAGE@SNAPSHOT or IMAGE SNAPSHOT, not %s %s", args[0], args[1])
		}
		return args[0], args[1], nil
	}
	image, snap, ok := strings.Cut(args[0], "@")
	if !ok || image == "" || snap == "" {
		return "", "", fmt.Errorf("%q: name the snapshot IMAGE@SNAPSHOT (vm1@before-upgrade)", args[0])
	}
	return image, snap, nil
}

func (a *app) snapshotCreateCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "create IMAGE@SNAPSHOT",
		Short: "Take a crash-consistent snapshot of an image while it stays in use",
		Long: "Take a crash-consistent snapshot of an image while it stays in use. Snapshots are named per image:\n" +
			"vm1@s1 and vm2@s1 are two snapshots. A snapshot's name is 1-64 letters, digits, '.', '_' or '-'.",
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			image, snap, err := snapshotArgs(args)
			if err != nil {
				return err
			}
			sn, err := a.client().CreateSnapshot(cmd.Context(), image, api.SnapshotRequest{Name: snap})
			if err != nil {
				return fmt.Errorf("snapshot %s@%s: %w", image, snap, err)
			}
			if asked, err := printIfAsked(cmd, a.out, sn); asked {
				return err
			}
			if output != "table" {
				return printAs(a.out, output, sn)
			}
			fmt.Fprintf(a.out, "created snapshot %s (%s)\n", sn.FullName, FormatSize(sn.Size))
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "table, json or yaml")
	return cmd
}

func (a *app) snapshotListCmd() *cobra.Command {
	var output string
	var all bool
	cmd := &cobra.Command{
		Use:   "list IMAGE",
		Short: "List an image's snapshots and how many blocks each holds itself",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			l, err := a.client().ListSnapshots(cmd.Context(), args[0], all)
			if err != nil {
				return fmt.Errorf("snapshots of %s: %w", args[0], err)
			}
			if output != "table" {
				return printAs(a.out, output, l)
			}
			tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSIZE\tCREATED\tPRESERVED BLOCKS\tLOCATIONS")
			for _, s := range l {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%v\n", s.FullName, FormatSize(s.Size), s.Created.Format("2006-01-02 15:04:05"), s.PreservedBlocks, s.Locations)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "table, json or yaml")
	cmd.Flags().BoolVar(&all, "all", false, "also list the temporary snapshots ukai takes for itself (a clone's, named .clone-...)")
	return cmd
}

func (a *app) snapshotDeleteCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "delete IMAGE@SNAPSHOT",
		Aliases: []string{"rm"},
		Short:   "Delete a snapshot (the image is not touched)",
		Args:    cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			image, snap, err := snapshotArgs(args)
			if err != nil {
				return err
			}
			if err := a.client().DeleteSnapshot(cmd.Context(), image, snap); err != nil {
				return fmt.Errorf("delete snapshot %s@%s: %w", image, snap, err)
			}
			fmt.Fprintf(a.out, "deleted snapshot %s@%s\n", image, snap)
			return nil
		},
	}
}

func (a *app) snapshotRevertCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "revert IMAGE@SNAPSHOT",
		Aliases: []string{"rollback"},
		Short:   "Make an image's data its snapshot's again, in place (the image's I/O waits meanwhile)",
		Long: "Make an image's data its snapshot's again, in place, on every copy. Only the blocks changed since\n" +
			"the snapshot are written back; the part of an image grown since reads as zeros. Initiators logged in\n" +
			"to the image see their I/O wait (not fail) until the revert ends; their caches are not told, so stop\n" +
			"the VM or unmount the file system first. The snapshot stays.",
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			image, snap, err := snapshotArgs(args)
			if err != nil {
				return err
			}
			img, err := a.client().RevertSnapshot(cmd.Context(), image, snap)
			if err != nil {
				return fmt.Errorf("revert %s to %s@%s: %w", image, image, snap, err)
			}
			if asked, err := printIfAsked(cmd, a.out, img); asked {
				return err
			}
			fmt.Fprintf(a.out, "reverted %s to %s@%s\n", image, image, snap)
			return nil
		},
	}
	return cmd
}

func (a *app) imageCloneCmd() *cobra.Command {
	var size string
	var locations []string
	var minCopies int
	cmd := &cobra.Command{
		Use:   "clone SOURCE NEW [--size SIZE] [--locations n1,n2] [--min-copies K]",
		Short: "Create image NEW holding the data of SOURCE: a snapshot, or an image (copied at one point in time while in use)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			var sz int64
			if size != "" {
				var err error
				if sz, err = ParseSize(size); err != nil {
					return fmt.Errorf("--size: %w", err)
				}
			}
			if minCopies < 0 {
				return fmt.Errorf("--min-copies: must be at least 1")
			}
			var pr *progress
			img, err := a.client().CopyImage(cmd.Context(), api.CreateImageRequest{Name: args[1], Source: args[0], Size: sz, Locations: locations, MinCopies: minCopies},
				func(p api.CopyProgress) {
					if pr == nil {
						pr = newProgress(cmd.ErrOrStderr(), "clone "+args[0], "bytes", p.Total)
					}
					pr.set(p.Done)
				})
			if pr != nil {
				if err == nil {
					pr.set(pr.total)
				}
				pr.finish()
			}
			if err != nil {
				return fmt.Errorf("clone %s into %s: %w", args[0], args[1], err)
			}
			fmt.Fprintf(a.out, "created image %s from %s: %s, target %s\n", img.Name, args[0], FormatSize(img.Size), img.IQN)
			return nil
		},
	}
	cmd.Flags().StringVar(&size, "size", "", "size of the new image (default: the source's; never smaller)")
	cmd.Flags().StringSliceVar(&locations, "locations", nil, "nodes holding copies (default: the source's)")
	cmd.Flags().IntVar(&minCopies, "min-copies", 0, "copies a write must reach (default: the source's)")
	return cmd
}

func (a *app) imageResizeCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "resize NAME SIZE|+SIZE",
		Short: "Grow an image online to SIZE, or by +SIZE (initiators are told the capacity changed); images never shrink",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			grow, relative := strings.CutPrefix(args[1], "+")
			sz, err := ParseSize(grow)
			if err != nil {
				return fmt.Errorf("size: %w", err)
			}
			if relative {
				if sz == 0 {
					return fmt.Errorf("size %s: grows by nothing", args[1])
				}
				cur, err := a.client().GetImage(cmd.Context(), args[0], false)
				if err != nil {
					return fmt.Errorf("resize %s: %w", args[0], err)
				}
				sz += cur.Size
			}
			img, err := a.client().ResizeImage(cmd.Context(), args[0], sz)
			if err != nil {
				return fmt.Errorf("resize %s: %w", args[0], err)
			}
			if asked, err := printIfAsked(cmd, a.out, img); asked {
				return err
			}
			fmt.Fprintf(a.out, "image %s is now %s (%d bytes)\n", img.Name, FormatSize(img.Size), img.Size)
			return nil
		},
	}
}

func (a *app) imageImportCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "import NAME FILE",
		Short: "Write a raw disk image file (or - for stdin) into an image from its start",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			var r io.Reader = os.Stdin
			total := int64(-1)
			if args[1] != "-" {
				f, err := os.Open(args[1])
				if err != nil {
					return err
				}
				defer f.Close()
				r = f
				if st, err := f.Stat(); err == nil && st.Mode().IsRegular() {
					total = st.Size()
				}
			}
			var pr *progress
			if total > 0 {
				pr = newProgress(cmd.ErrOrStderr(), "import "+args[0], "bytes", total)
				r = countingReader{r: r, p: pr}
			}
			n, err := a.client().WriteData(cmd.Context(), args[0], r)
			if pr != nil {
				pr.finish()
			}
			if err != nil {
				return fmt.Errorf("import into %s: %w", args[0], err)
			}
			fmt.Fprintf(a.out, "wrote %d bytes into %s\n", n, args[0])
			return nil
		},
	}
}

func (a *app) imageExportDataCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "download NAME FILE",
		Short: "Read a whole image or snapshot into a raw file (or - for stdout)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			var w io.Writer = a.out
			var sw *sparseWriter
			if args[1] != "-" {
				f, err := os.OpenFile(args[1], os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
				if err != nil {
					return err
				}
				defer f.Close()
				sw = &sparseWriter{f: f}
				w = sw
			}
			// Progress goes to stderr: stdout may be the data.
			var pr *progress
			cw := &countingWriter{w: w}
			err := a.client().ReadData(cmd.Context(), args[0], func(size int64) {
				pr = newProgress(cmd.ErrOrStderr(), "download "+args[0], "bytes", size)
				cw.p = pr
			}, cw)
			if pr != nil {
				pr.finish()
			}
			if err == nil && sw != nil {
				err = sw.finish()
			}
			if err != nil {
				if args[1] != "-" {
					os.Remove(args[1])
				}
				return fmt.Errorf("download %s: %w", args[0], err)
			}
			return nil
		},
	}
}

// sparseWriter writes a file leaving holes where the data is zeros (a
// 2 GiB image with 3 MiB written is not a 2 GiB file): runs of zero
// pages are skipped, and finish sets the size and syncs.
type sparseWriter struct {
	f   *os.File
	off int64
}

const sparsePage = 4096

func (w *sparseWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		// The next run of zero pages, then the next run of data pages.
		z := 0
		for z < len(p) && isZero(p[z:min(z+sparsePage, len(p))]) {
			z = min(z+sparsePage, len(p))
		}
		w.off += int64(z)
		p = p[z:]
		d := 0
		for d < len(p) && !isZero(p[d:min(d+sparsePage, len(p))]) {
			d = min(d+sparsePage, len(p))
		}
		if d > 0 {
			if _, err := w.f.WriteAt(p[:d], w.off); err != nil {
				return 0, err
			}
			w.off += int64(d)
			p = p[d:]
		}
	}
	return n, nil
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// finish gives the file its full size (a trailing hole included) and
// makes it durable.
func (w *sparseWriter) finish() error {
	if err := w.f.Truncate(w.off); err != nil {
		return err
	}
	if err := w.f.Sync(); err != nil {
		return err
	}
	return w.f.Close()
}
