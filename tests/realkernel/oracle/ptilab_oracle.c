// SPDX-License-Identifier: GPL-2.0
/*
 * ptilab_oracle: the kernel's own ptdump of one task's page tables, for the
 * real-kernel fixtures (tests/realkernel/build.py).
 *
 * Debian builds its kernels with CONFIG_PTDUMP_CORE (7.x: CONFIG_PTDUMP) but
 * without CONFIG_PTDUMP_DEBUGFS, so /sys/kernel/debug/page_tables/ is absent;
 * the walker itself, ptdump_walk_pgd_level_debugfs() in
 * arch/x86/mm/dump_pagetables.c, is built in.  Up to 6.x it is exported (GPL);
 * 7.x no longer exports it, so the module finds it as kprobes do, by name
 * (register_kprobe() resolves kp.symbol_name), on every kernel alike.  This
 * module calls it for the mm of the task given as `pid=` and shows, under
 * /sys/kernel/debug/ptilab_oracle/:
 *
 *   user    ptdump of that mm's user PGD (kernel_to_user_pgdp() under PTI),
 *           the text Linux prints in page_tables/current_user
 *   kernel  ptdump of that mm's kernel PGD (page_tables/current_kernel)
 *   task    "pid comm pgd_phys_hex" of that task
 *   tasks   the same line for every task with an mm but the reader
 *
 * pgd_phys is __pa(mm->pgd): the kernel PGD; under PTI the user PGD is the
 * next page (PTI_PGTABLE_SWITCH_BIT, bit 12).
 */
#include <linux/debugfs.h>
#include <linux/kprobes.h>
#include <linux/module.h>
#include <linux/mm.h>
#include <linux/pid.h>
#include <linux/sched.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/seq_file.h>
#include <asm/pgtable.h>

static int pid = -1;
module_param(pid, int, 0444);
MODULE_PARM_DESC(pid, "the task whose page tables user/kernel/task show");

static struct dentry *dir;
static void (*walk_debugfs)(struct seq_file *m, struct mm_struct *mm, bool user);

/* The address of a built-in function by name, exported or not, or NULL. */
static void *lookup(const char *name)
{
	struct kprobe kp = { .symbol_name = name };
	void *addr;

	if (register_kprobe(&kp) < 0)
		return NULL;
	addr = kp.addr;
	unregister_kprobe(&kp);
	return addr;
}

/* The mm of `pid`, with a reference held (mmput() it), or NULL. */
static struct mm_struct *target_mm(struct task_struct **taskp)
{
	struct task_struct *task;
	struct mm_struct *mm;

	task = get_pid_task(find_get_pid(pid), PIDTYPE_PID);
	if (!task)
		return NULL;
	mm = get_task_mm(task);
	if (!mm) {
		put_task_struct(task);
		return NULL;
	}
	*taskp = task;
	return mm;
}

static int show_walk(struct seq_file *m, bool user)
{
	struct task_struct *task;
	struct mm_struct *mm = target_mm(&task);

	if (!mm)
		return -ESRCH;
	walk_debugfs(m, mm, user);
	mmput(mm);
	put_task_struct(task);
	return 0;
}

static int user_show(struct seq_file *m, void *v)
{
	return show_walk(m, true);
}

static int kernel_show(struct seq_file *m, void *v)
{
	return show_walk(m, false);
}

static int task_show(struct seq_file *m, void *v)
{
	struct task_struct *task;
	struct mm_struct *mm = target_mm(&task);

	if (!mm)
		return -ESRCH;
	seq_printf(m, "%d %s %llx\n", task_pid_nr(task), task->comm,
		   (unsigned long long)__pa(mm->pgd));
	mmput(mm);
	put_task_struct(task);
	return 0;
}

static int tasks_show(struct seq_file *m, void *v)
{
	struct task_struct *task;

	rcu_read_lock();
	for_each_process(task) {
		task_lock(task);
		/*
		 * Kernel threads borrow an mm (active_mm) but own none; the
		 * reader (cat) exits before the freeze and its PGD is freed.
		 */
		if (task->mm && !(task->flags & PF_KTHREAD) &&
		    task != current->group_leader)
			seq_printf(m, "%d %s %llx\n", task_pid_nr(task), task->comm,
				   (unsigned long long)__pa(task->mm->pgd));
		task_unlock(task);
	}
	rcu_read_unlock();
	return 0;
}

DEFINE_SHOW_ATTRIBUTE(user);
DEFINE_SHOW_ATTRIBUTE(kernel);
DEFINE_SHOW_ATTRIBUTE(task);
DEFINE_SHOW_ATTRIBUTE(tasks);

static int __init oracle_init(void)
{
	walk_debugfs = lookup("ptdump_walk_pgd_level_debugfs");
	if (!walk_debugfs) {
		pr_err("ptilab_oracle: ptdump_walk_pgd_level_debugfs not found\n");
		return -ENOENT;
	}
	dir = debugfs_create_dir("ptilab_oracle", NULL);
	debugfs_create_file("user", 0400, dir, NULL, &user_fops);
	debugfs_create_file("kernel", 0400, dir, NULL, &kernel_fops);
	debugfs_create_file("task", 0400, dir, NULL, &task_fops);
	debugfs_create_file("tasks", 0400, dir, NULL, &tasks_fops);
	return 0;
}

static void __exit oracle_exit(void)
{
	debugfs_remove_recursive(dir);
}

module_init(oracle_init);
module_exit(oracle_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("ptdump of one task's user and kernel PGD, for ptilab's tests");
